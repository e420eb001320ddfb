"""Write tests/data/nt_standard_ntk.npz: neural-tangents' NNGP and NTK in its *standard*
parameterisation (``parameterization="standard"``), for the tests of cnngp's (docs/maths.md §7).

    bash ../shared/bench/nt_env.sh            # builds /tmp/ntvenv (neural-tangents 0.6.5)
    /tmp/ntvenv/bin/python benchmarks/make_nt_standard_reference.py

Each case is a cnngp spec (stored beside the arrays as JSON), translated here to stax layer by
layer: conv → Conv(out_chan=channels, W_std=√weight_var, b_std=√bias_var) (b_std = 0.0, not
None: the standard parameterisation always trains a bias), relu → ABRelu(0, √2), abrelu,
erf, avgpool, flatten, global_avg_pool; readout → Dense(1) (independent correlation only).
Inputs: the first images of the MNIST subset, 10×10 crops (2-D cases) or one row (1-D).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "mnist_subset.npz")
OUT = os.path.join(HERE, "..", "tests", "data", "nt_standard_ntk.npz")


def conv(filter, stride=1, padding="same", weight_var=1.0, bias_var=0.0, channels=None):
    return {"type": "conv", "filter": filter, "stride": stride, "padding": padding,
            "weight_var": weight_var, "bias_var": bias_var, "parameterization": "standard",
            "channels": channels}


def readout(weight_var=1.0, bias_var=0.0):
    return {"type": "readout", "weight_var": weight_var, "bias_var": bias_var, "parameterization": "standard"}


CASES = {
    # widths differ per layer, so each fan-in is checked
    "flatten_2d": [conv(3, channels=7), {"type": "relu"}, conv(3, 2, "valid", 2.0, 0.1, channels=5),
                   {"type": "abrelu", "a": 0.1, "b": 1.0}, {"type": "flatten"}, readout(1.5, 0.2)],
    "gap_pool_erf": [conv(3, weight_var=1.7, bias_var=0.05, channels=6), {"type": "erf"},
                     {"type": "avgpool", "window": 2}, conv(3, channels=9), {"type": "relu"},
                     {"type": "global_avg_pool"}, readout()],
    "readout_on_grid": [conv(3, channels=4), {"type": "relu"}, conv(3, channels=8), {"type": "relu"},
                        readout()],
    "conv1d": [conv(3, 2, "valid", channels=5), {"type": "relu"}, conv(3, channels=3), {"type": "relu"},
               {"type": "flatten"}, readout()],
}


def stax_layers(spec, d):
    from neural_tangents import stax

    out = []
    for layer in spec:
        t = layer["type"]
        if t == "conv":
            f, s = (layer["filter"],) * d, (layer["stride"],) * d
            out.append(stax.Conv(layer["channels"], f, s, layer["padding"].upper(),
                                 W_std=math.sqrt(layer["weight_var"]), b_std=math.sqrt(layer["bias_var"]),
                                 parameterization="standard"))
        elif t == "relu":
            out.append(stax.ABRelu(0.0, math.sqrt(2.0)))
        elif t == "abrelu":
            out.append(stax.ABRelu(layer["a"], layer["b"]))
        elif t == "erf":
            out.append(stax.Erf())
        elif t == "avgpool":
            w = (layer["window"],) * d
            out.append(stax.AvgPool(w, w, "VALID"))
        elif t == "flatten":
            out.append(stax.Flatten())
        elif t == "global_avg_pool":
            out.append(stax.GlobalAvgPool())
        elif t == "readout":
            if d and not any(prev["type"] in ("flatten", "global_avg_pool") for prev in spec):
                out.append(stax.Flatten())  # an independent readout on the grid: a dense layer on it
            out.append(stax.Dense(1, W_std=math.sqrt(layer["weight_var"]), b_std=math.sqrt(layer["bias_var"]),
                                  parameterization="standard"))
        else:
            raise ValueError(t)
    return stax.serial(*out)


def main():
    import jax

    jax.config.update("jax_enable_x64", True)
    x_all = np.load(DATA)["x_train"].astype(np.float64)  # (N, 28, 28[, 1])
    if x_all.ndim == 3:
        x_all = x_all[..., None]
    arrays = {}
    for name, spec in CASES.items():
        if name == "conv1d":
            x = x_all[:4, 14, 4:24, :]  # (4, 20, 1): one image row
        else:
            x = x_all[:4, 9:19, 9:19, :]  # (4, 10, 10, 1)
        x = x / max(1.0, float(np.abs(x).max()))
        _, _, kernel_fn = stax_layers(spec, x.ndim - 2)
        k = kernel_fn(x, x, ("nngp", "ntk"))
        arrays[f"{name}_x"] = x
        arrays[f"{name}_nngp"] = np.asarray(k.nngp)
        arrays[f"{name}_ntk"] = np.asarray(k.ntk)
        arrays[f"{name}_spec"] = np.array(json.dumps({"layers": spec}))
        print(name, np.asarray(k.ntk)[0, :2])
    np.savez(OUT, **arrays)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
