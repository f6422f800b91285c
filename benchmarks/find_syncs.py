"""Where does a CUDA fit synchronise with the host? (diagnostic; run on a GPU machine)

Counts torch's sync-debug warnings during a fit's training steps, grouped by the innermost
ppvi/pyro/model frame that triggered them.
"""

import collections
import importlib
import sys
import traceback
import warnings

import torch

fit_module = importlib.import_module("ppvi.fit")  # the module, not ppvi.fit the function

model = sys.argv[1] if len(sys.argv) > 1 else "gmm"
sites = collections.Counter()


def record(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message):
        return
    frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
    sites[" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}:{f.name}" for f in frames[-3:])] += 1


original_train = fit_module._train


def traced_train(*args, **kwargs):
    torch.cuda.set_sync_debug_mode("warn")
    try:
        return original_train(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


fit_module._train = traced_train
warnings.showwarning = record
warnings.simplefilter("always")
fit_module.fit(model, steps=100, device="cuda")
for where, count in sites.most_common(15):
    print(f"{count:6d}  {where}")
