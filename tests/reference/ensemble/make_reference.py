"""Make tests/reference/ensemble/gd_ensemble.npz: neural-tangents' trained-ensemble predictions.

Two steps, two environments (neural-tangents is not a dependency of cnngp):

    python tests/reference/ensemble/make_reference.py kernels /tmp/k.npz          # cnngp's env
    /tmp/ntvenv/bin/python tests/reference/ensemble/make_reference.py nt /tmp/k.npz  # NT 0.6.5 env

The first computes the NNGP and NTK of a small CNN with a Matérn-3/2 correlated readout (cnngp,
float64) on 24 digits (16 training, 8 test images) and random labels. The second feeds those
exact matrices to neural-tangents 0.6.5's `predict.gradient_descent_mse_ensemble` (through a
kernel function that looks them up by image index) and stores its means and covariances, for
both modes, at several training times and at t = inf, for two absolute ridges (diag_reg with
diag_reg_absolute_scale=True). tests/test_ensemble.py compares cnngp.inference.ensemble with them.
"""

import sys

import numpy as np

TIMES = np.array([0.0, 0.3, 2.0, 15.0, 120.0, 5000.0, 1e6])
LEARNING_RATE = 0.7
RIDGES = (0.0, 0.05)
N_TRAIN, N_TEST, N_CLASSES = 16, 8, 3


def kernels(out):
    import torch
    from sklearn.datasets import load_digits

    import cnngp

    torch.set_default_dtype(torch.float64)
    digits = load_digits()
    x = digits.images[: N_TRAIN + N_TEST, :, :, None] / 16.0
    net = cnngp.Serial(cnngp.Conv(3, padding="same"), cnngp.ReLU(), cnngp.Conv(3, padding="same"),
                       cnngp.ReLU(), cnngp.Readout(correlation=cnngp.Matern(1.5, 2.0)))
    nngp, ntk = cnngp.kernel(net, torch.as_tensor(x), get="both")
    y = np.random.default_rng(0).integers(0, N_CLASSES, N_TRAIN)
    np.savez(out, nngp=nngp.numpy(), ntk=ntk.numpy(), y_train=y)


def nt(path):
    import collections

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from neural_tangents import predict

    d = dict(np.load(path))
    joint = {"nngp": jnp.asarray(d["nngp"]), "ntk": jnp.asarray(d["ntk"])}
    Kernel = collections.namedtuple("Kernel", "nngp ntk", defaults=(None, None))

    def kernel_fn(x1, x2, get, **_):  # the inputs are image indices, shape (n, 1)
        i = np.asarray(x1[:, 0], dtype=int)
        j = i if x2 is None else np.asarray(x2[:, 0], dtype=int)
        if isinstance(get, str):
            return joint[get][np.ix_(i, j)]
        return Kernel(**{g: joint[g][np.ix_(i, j)] for g in get})

    x_train = np.arange(N_TRAIN, dtype=float)[:, None]
    x_test = np.arange(N_TRAIN, N_TRAIN + N_TEST, dtype=float)[:, None]
    y = np.eye(N_CLASSES)[d["y_train"]] - 1.0 / N_CLASSES
    out = {**d, "times": TIMES, "learning_rate": LEARNING_RATE, "ridges": np.array(RIDGES)}
    for r, ridge in enumerate(RIDGES):
        fn = predict.gradient_descent_mse_ensemble(kernel_fn, x_train, jnp.asarray(y),
                                                   learning_rate=LEARNING_RATE, diag_reg=ridge,
                                                   diag_reg_absolute_scale=True)
        for mode in ("nngp", "ntk"):
            finite = fn(TIMES, x_test, mode, compute_cov=True)
            converged = fn(None, x_test, mode, compute_cov=True)
            out[f"{mode}_mean_{r}"] = np.concatenate([finite.mean, converged.mean[None]])
            out[f"{mode}_cov_{r}"] = np.concatenate([finite.covariance, converged.covariance[None]])
    np.savez_compressed(__file__.rsplit("/", 1)[0] + "/gd_ensemble.npz", **out)


if __name__ == "__main__":
    {"kernels": kernels, "nt": nt}[sys.argv[1]](sys.argv[2])
