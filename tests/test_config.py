"""Config validation: every bad value is one sentence naming the field and what is allowed."""

import dataclasses
import math

import pytest

from engine import Config, UserError


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"model": "vgg11"}, "model must be one of vgg16, vgg19, not 'vgg11'"),
        ({"optimizer": "sgd"}, "optimizer must be one of adam, lbfgs"),
        ({"init": "random"}, "init must be one of content, palette, noise, gray"),
        ({"pooling": "l2"}, "pooling must be one of max, avg"),
        ({"style_layers": ("relu1_1", "relu6_1")}, "unknown layer 'relu6_1' for vgg19"),
        ({"model": "vgg16", "style_layers": ("relu5_4",)}, "unknown layer 'relu5_4' for vgg16"),
        ({"style_layers": ()}, "style_layers must name at least one layer"),
        ({"style_weight": -1.0}, "style_weight must be a finite number zero or more, not -1.0"),
        ({"content_weight": math.nan}, "content_weight must be a finite number"),
        ({"tv_weight": math.inf}, "tv_weight must be a finite number"),
        ({"lr": 0.0}, "lr must be a finite number greater than zero"),
        ({"style_scale": 0.0}, "style_scale must be a finite number greater than zero"),
        ({"style_layer_weights": (1.0, 2.0)}, "style_layer_weights has 2 values but there are 5 style layers"),
        ({"style_layer_weights": (0.0,) * 5}, "style_layer_weights must not all be zero"),
        (
            {"content_layers": ("relu4_2",), "content_layer_weights": (-1.0,)},
            "content_layer_weights must be a finite number zero or more",
        ),
        ({"style_blend_weights": (1.0, -2.0)}, "style_blend_weights must be a finite number zero or more"),
        ({"size": 0}, "size must be a positive whole number, not 0"),
        ({"size": 2.5}, "size must be a positive whole number, not 2.5"),
        ({"steps": True}, "steps must be a positive whole number"),
        ({"size": 200000}, "size 200000 is larger than the 16384 px"),
        ({"size": 64, "min_size": 96}, "min_size 96 is larger than size 64: the first scale cannot be larger"),
        ({"size": 8192, "style_scale": 4.0}, "style_scale 4.0 makes the style images 32768 px"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
        ({"seed": "x"}, "seed must be a whole number"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(UserError) as info:
        Config(**kwargs)
    assert match in str(info.value)
    assert "\n" not in str(info.value)


def test_defaults_and_normalisation():
    c = Config(style_layers=["relu1_1", "relu4_2"], content_layers=["relu4_2"], style_layer_weights=[1, 2])
    assert c.style_layers == ("relu1_1", "relu4_2")  # lists become tuples: the config stays hashable
    assert c.feature_layers == ("relu4_2", "relu1_1")
    assert hash(c) == hash(
        Config(style_layers=("relu1_1", "relu4_2"), content_layers=("relu4_2",), style_layer_weights=(1, 2))
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.size = 3
    assert Config().content_layers is None  # the style loss's own (tests/test_auto_loss.py)
    assert Config(size=64).min_size == 128  # the default minimum below a small size: one scale, not an error
    assert Config().style_layers == ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
