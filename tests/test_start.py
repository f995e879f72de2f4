"""Where each scale starts: ``--init palette`` (the photo in the paintings' colours) and ``--detail`` (the photo's
detail added back when a result is carried to a finer scale)."""

import dataclasses

import pytest
import torch
from helpers import stop_after

from engine import Config, UserError, stylize
from engine import checkpoint as ckpt
from engine.color import colour_moments, palette_start
from engine.core import JobInput, finer, initial_image
from engine.images import resize
from engine.optimize import Interrupted


def picture(h, w, seed, tint):
    g = torch.Generator().manual_seed(seed)
    smooth = resize(torch.rand(3, h // 4, w // 4, generator=g), (h, w))
    return (0.25 + 0.5 * smooth * torch.tensor(tint)[:, None, None]).clamp(0, 1)


def moments(image):
    flat = image.reshape(3, -1).double()
    return flat.mean(1), torch.cov(flat, correction=0)


def test_palette_gives_the_photo_the_paintings_colour_mean_and_covariance():
    photo = picture(40, 48, 1, (0.9, 0.6, 0.3))
    painting = picture(32, 36, 2, (0.3, 0.5, 0.9))
    moved = palette_start(photo, [painting], [1.0])
    (m, c), (mt, ct) = moments(moved), moments(painting)
    torch.testing.assert_close(m, mt, rtol=0, atol=1e-5)
    torch.testing.assert_close(c, ct, rtol=1e-3, atol=1e-7)
    assert not torch.allclose(moments(photo)[1], ct, atol=1e-4)
    # The layout is the photo's: every pixel goes through one affine map of its colour.
    x = torch.cat([photo.reshape(3, -1), torch.ones(1, photo[0].numel())]).double()
    fit = torch.linalg.lstsq(x.T, moved.reshape(3, -1).double().T).solution
    assert (x.T @ fit - moved.reshape(3, -1).double().T).abs().max() < 1e-5


def test_two_paintings_give_the_moments_of_their_blended_pixels():
    a, b = picture(20, 20, 3, (1.0, 0.2, 0.2)), picture(20, 20, 4, (0.2, 0.2, 1.0))
    # Weights 3:1 on images of one size: the mixture is a's pixels three times and b's once.
    mean, cov = colour_moments([a, b], [0.75, 0.25])
    m, c = moments(torch.cat([a, a, a, b], dim=2))
    torch.testing.assert_close(mean[:, 0], m, rtol=0, atol=1e-12)
    torch.testing.assert_close(cov, c, rtol=0, atol=1e-12)


def job(content, styles=(), init=None):
    return JobInput(content=content, styles=list(styles), blend=tuple(1.0 for _ in styles), init=init)


def test_the_palette_start_is_the_first_scales_photo_in_the_paintings_colours():
    photo, painting = picture(64, 48, 5, (0.9, 0.6, 0.3)), picture(40, 40, 6, (0.3, 0.5, 0.9))
    small = resize(photo, (32, 24))[None]
    start = initial_image(Config(init="palette"), small, job(photo, [painting]))
    torch.testing.assert_close(start[0], palette_start(small[0], [painting], [1.0]))
    assert torch.equal(initial_image(Config(init="content"), small, job(photo, [painting])), small)


def test_with_detail_1_a_result_equal_to_the_coarse_photo_becomes_the_fine_photo():
    photo = picture(64, 48, 7, (0.8, 0.8, 0.8))
    coarse, fine = resize(photo, (32, 24))[None], resize(photo, (45, 34))[None]
    # Only the detail the 32 px scale could not hold is added: the coarse photo becomes the fine one.
    got = finer(coarse, content=fine, jobs=[job(photo)], config=Config(detail=1.0))
    torch.testing.assert_close(got[0], resize(photo, (45, 34)), rtol=0, atol=1e-6)
    plain = finer(coarse, content=fine, jobs=[job(photo)], config=Config(detail=0.0))
    assert torch.equal(plain, resize(coarse, (45, 34)))
    half = finer(coarse, content=fine, jobs=[job(photo)], config=Config(detail=0.5))
    torch.testing.assert_close(half, (plain + got) / 2, rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 0.01  # there was detail to add


def test_detail_is_the_photos_only_when_the_run_starts_from_the_photo():
    photo = picture(64, 48, 8, (0.8, 0.8, 0.8))
    coarse, fine = resize(photo, (32, 24))[None], resize(photo, (64, 48))[None]
    plain = resize(coarse, (64, 48))
    for config in (Config(detail=1.0, init="noise"), Config(detail=1.0, init="gray")):
        assert torch.equal(finer(coarse, content=fine, jobs=[job(photo)], config=config), plain)
    # A start image of the caller's own (a file, a video's warped frame): that job gets no photo detail.
    own = job(photo, init=torch.zeros(3, 64, 48))
    both = finer(
        torch.cat([coarse, coarse]), content=torch.cat([fine, fine]), jobs=[job(photo), own], config=Config(detail=1.0)
    )
    assert torch.equal(both[1], plain[0]) and not torch.equal(both[0], plain[0])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "1"])
def test_a_bad_detail_is_one_sentence(bad):
    with pytest.raises(UserError, match=r"detail must be a fraction from 0 to 1, not"):
        Config(detail=bad)


def test_palette_is_an_init_and_a_typo_names_it():
    assert Config(init="palette").init == "palette"
    with pytest.raises(UserError, match="init must be one of content, palette, noise, gray, or an image file"):
        Config(init="pallete")


def test_a_run_with_both_starts_resumed_in_its_second_scale_ends_at_the_same_image(tmp_path):
    photo, painting = picture(48, 64, 9, (0.9, 0.6, 0.3)), picture(40, 40, 10, (0.3, 0.5, 0.9))
    config = Config(
        device="cpu",
        size=64,
        min_size=32,
        schedule="lean",  # 32 then 64 px: one finer scale, where the detail is added
        steps=6,
        init="palette",
        detail=1.0,
        content_layers=("relu2_2",),
        style_layers=("relu1_1", "relu2_1"),
    )
    full = stylize(photo, painting, config)
    plain = stylize(photo, painting, dataclasses.replace(config, detail=0.0))
    assert (full.image - plain.image).abs().max() > 0.01  # the detail changed the result
    plan = ckpt.CheckpointPlan(str(tmp_path / "run.ckpt"))
    with pytest.raises(Interrupted):
        stylize(photo, painting, config, checkpoint=plan, control=stop_after(8))  # 2 steps into the 64 px scale
    resumed = stylize(photo, painting, config, resume=ckpt.load(tmp_path / "run.ckpt"))
    torch.testing.assert_close(resumed.image, full.image, rtol=0, atol=1e-6)
