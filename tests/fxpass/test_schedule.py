"""fxpass.schedule: guided-diffusion's timestep respacing (``timestep_respacing``)."""

from __future__ import annotations

import pytest

from fxpass.schedule import model_timesteps, respaced


def test_250_of_4000_camus():
    steps = respaced(4000, "250")
    assert len(steps) == 250
    assert steps[0] == 0 and steps[-1] == 3999
    assert all(a < b for a, b in zip(steps, steps[1:]))
    # evenly rounded fractional stride 3999/249, as guided-diffusion's space_timesteps takes them
    assert steps == [round(i * 3999 / 249) for i in range(250)]
    assert steps[:5] == [0, 16, 32, 48, 64]


def test_ddim50_of_1000_is_stride_20():
    assert respaced(1000, "ddim50") == list(range(0, 1000, 20))


def test_ddim_docstring_example():
    assert respaced(1000, "ddim4") == [0, 250, 500, 750]


def test_comma_sections_10_15_20_of_300():
    steps = respaced(300, "10,15,20")
    assert len(steps) == 45
    first, second, third = steps[:10], steps[10:25], steps[25:]
    # three sections of 100 steps, each sampled from its first to its last step
    assert first == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert second[0] == 100 and second[-1] == 199 and all(100 <= s < 200 for s in second)
    assert third[0] == 200 and third[-1] == 299 and all(200 <= s < 300 for s in third)
    # guided-diffusion accumulates the float stride (99/14 added 7 times is 49.4999..., so 149, where
    # round(7 * 99 / 14) would give 150): the steps must be the ones upstream takes
    assert second == [100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199]
    assert all(a < b for a, b in zip(steps, steps[1:]))


def test_uneven_sections_give_the_extra_steps_to_the_first():
    # 10 steps in 2 sections of 5; a count of 1 takes the section's first step
    assert respaced(10, [2, 3]) == [0, 4, 5, 7, 9]
    assert respaced(11, "1,1") == [0, 6]
    assert respaced(100, "10,5")[:3] == [0, 5, 11]


def test_empty_keeps_every_step():
    assert respaced(7, "") == list(range(7))
    assert respaced(7, "7") == list(range(7))


def test_int_and_sequence_inputs():
    assert respaced(10, 5) == respaced(10, "5") == [0, 2, 4, 7, 9]
    assert respaced(10, (5,)) == respaced(10, 5)


@pytest.mark.parametrize(
    "steps, spec, message",
    [
        (1000, "ddim1", "cannot take exactly 1 steps"),
        (1000, "ddim0", "cannot take exactly 0 steps"),
        (1000, "ddimx", "expected ddimN"),
        (1000, "abc", "expected comma-separated step counts"),
        (1000, "1,,2", "expected comma-separated step counts"),
        (1000, "0", "must be positive"),
        (1000, "-5", "must be positive"),
        (100, "300", "cannot divide a section of 100 steps into 300"),
        (2, "1,1,1", "3 sections for 2 steps"),
        (0, "", "diffusion_steps must be positive"),
    ],
)
def test_errors(steps, spec, message):
    with pytest.raises(ValueError, match=message):
        respaced(steps, spec)


def test_model_timesteps():
    kept = respaced(4000, "ddim4")
    assert model_timesteps(4000, kept) == kept
    assert model_timesteps(4000, kept, rescale_timesteps=True) == [0.0, 250.0, 500.0, 750.0]
