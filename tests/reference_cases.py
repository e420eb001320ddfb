"""The networks of tests/reference/cases.json written as cnngp JSON specs (without readout).

neural-tangents' NTK parameterisation: ``weight_var = W_std²``, ``bias_var = b_std²``.
"""

RELU = {"type": "relu"}
CONV3 = {"type": "conv", "filter": 3}


def conv_relu(n):
    return [CONV3, RELU] * n


def _pool():
    return {"type": "avgpool", "window": 2, "stride": 2, "padding": "valid"}


BODIES = {
    "cnngp4": conv_relu(4),
    "cnngp14": conv_relu(14),
    "myrtle10": conv_relu(3) + [_pool()] + conv_relu(3) + [_pool()] + conv_relu(3),
    "myrtle10_paper": conv_relu(3) + [_pool()] + conv_relu(3) + [_pool()] + conv_relu(2),
    "mixed_mnist": [
        {"type": "conv", "filter": [5, 5], "stride": 2, "padding": "valid", "weight_var": 1.2**2, "bias_var": 0.1**2},
        {"type": "erf", "a": 1, "b": 1, "c": 0},
        {"type": "conv", "filter": 3, "padding": "same", "weight_var": 1.0, "bias_var": 0.05**2},
        {"type": "abrelu", "a": 0.1, "b": 1.0},
        {"type": "avgpool", "window": 3, "stride": 1, "padding": "same"},
        {"type": "conv", "filter": 3, "padding": "same", "weight_var": 1.5**2},
        RELU,
    ],
    "conv1d_digits": [
        {"type": "conv", "filter": 5, "padding": "same"},
        RELU,
        {"type": "conv", "filter": 3, "stride": 2, "padding": "same"},
        RELU,
        {"type": "conv", "filter": 3, "padding": "valid"},
        RELU,
    ],
    "conv3d_random": [{"type": "conv", "filter": [3, 3, 3]}, RELU, CONV3, RELU],
}
