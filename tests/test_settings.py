"""SamplingSettings: every setting checked once, with messages that name it as the caller calls it;
the plan the sampler follows per cell (steps, guidance, the times it evaluates)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from xar_infer.errors import InvalidArgumentError
from xar_infer.sampling import NoiseSource, apply_updates, sample_image
from xar_infer.settings import (
    MAX_STEPS,
    CellPlan,
    SamplingSettings,
    cell_guidance_scales,
    evaluation_times,
    evaluations_per_cell,
)

# How a command line might name the settings (the CLI passes its own option names the same way).
OPTION_NAMES = {"num_inference_steps": "--steps", "guidance_scale": "--cfg", "sampler": "--sampler",
                "guidance_schedule": "--guidance-schedule", "guidance_interval": "--guidance-interval"}

GOOD = dict(num_cells=4, num_inference_steps=4, guidance_scale=2.0)


def test_one_step_count_is_repeated_per_cell_and_values_are_normalised():
    settings = SamplingSettings.build(4, 3, 2)
    assert settings == SamplingSettings((3, 3, 3, 3), 2.0, "sde", "linear", None)
    assert type(settings.guidance_scale) is float
    assert SamplingSettings.build(4, [4, 3, 2, 1], 2.5).steps_per_cell == (4, 3, 2, 1)
    assert SamplingSettings.build(4, (4, 3, 2, 1), 2.5).steps_per_cell == (4, 3, 2, 1)
    interval = SamplingSettings.build(4, 3, 2.0, "heun", "constant", [0, 1]).guidance_interval
    assert interval == (0.0, 1.0) and all(type(v) is float for v in interval)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingSettings.build(4, 3, 2.0).guidance_scale = 3.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_inference_steps=0),
     r"num_inference_steps must be a positive integer or a list of 4 of them \(one per cell\), got 0"),
    (dict(num_inference_steps=-2), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=True), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps="4"), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=[]), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=[3, 0, 1, 1]), r"num_inference_steps must be a positive integer .*got \[3, 0, 1, 1\]"),
    (dict(num_inference_steps=MAX_STEPS + 1), "num_inference_steps must be at most 1000 per cell .*, got 1001"),
    (dict(num_inference_steps=[3, 2]), r"num_inference_steps must be a positive integer or a list of 4 of them \(one "
                                       r"per cell\): \[3, 2\] gives 2 counts, but this model makes 4 cells$"),
    (dict(num_inference_steps=[5]), r"\[5\] gives 1 count"),  # a list is per cell
    (dict(guidance_scale=0.5), r"guidance_scale must be a finite number >= 1 \(1 turns guidance off\), got 0.5"),
    (dict(guidance_scale=math.nan), "guidance_scale must be a finite number >= 1"),
    (dict(guidance_scale=math.inf), "guidance_scale must be a finite number >= 1"),
    (dict(guidance_scale=True), "guidance_scale must be a finite number >= 1"),
    (dict(guidance_scale="2"), "guidance_scale must be a finite number >= 1"),
    (dict(sampler="ddim"), r"sampler must be one of \('sde', 'euler', 'heun'\), got 'ddim'"),
    (dict(guidance_schedule="cosine"), r"guidance_schedule must be one of \('linear', 'constant'\), got 'cosine'"),
    (dict(guidance_interval=(0.8, 0.2)), r"guidance_interval must be \(lo, hi\) with 0 <= lo <= hi <= 1"),
    (dict(guidance_interval=(0.1, 1.5)), "guidance_interval must be"),
    (dict(guidance_interval=(-0.1, 0.5)), "guidance_interval must be"),
    (dict(guidance_interval=0.5), "guidance_interval must be"),
    (dict(guidance_interval=(0.5,)), "guidance_interval must be"),
    (dict(guidance_interval=(False, True)), "guidance_interval must be"),
    (dict(guidance_interval=("0", 1)), "guidance_interval must be"),
])
def test_each_bad_setting_is_refused_by_name(kwargs, message):
    arguments = {**GOOD, **kwargs}
    with pytest.raises(InvalidArgumentError, match=message):
        SamplingSettings.build(**arguments)


@pytest.mark.parametrize("setting, value", [("num_inference_steps", 0), ("guidance_scale", 0.5), ("sampler", "ddim"),
                                            ("guidance_schedule", "cosine"), ("guidance_interval", (1, 0))])
def test_messages_use_the_callers_names(setting, value):
    arguments = {**GOOD, setting: value}
    with pytest.raises(InvalidArgumentError) as error:
        SamplingSettings.build(**arguments, names=OPTION_NAMES)
    message = str(error.value)
    assert message.startswith(OPTION_NAMES[setting] + " ")
    assert setting not in message.removeprefix(OPTION_NAMES[setting])  # the API name appears nowhere


def test_a_per_cell_list_is_shown_as_it_was_typed():
    with pytest.raises(InvalidArgumentError, match=r"^--steps must be a positive integer or a list of 4 of them \(one "
                                                   r"per cell\): 10,8 gives 2 counts, but this model makes 4 cells$"):
        SamplingSettings.build(4, [10, 8], 2.0, names=OPTION_NAMES)


def test_without_a_model_every_check_but_the_list_length_runs():
    """``num_cells`` None: a model not loaded yet, so a per-cell list of any length passes."""
    assert SamplingSettings.build(None, [4, 3], 2.0).steps_per_cell == (4, 3)
    with pytest.raises(InvalidArgumentError, match=r"must be a positive integer or a list of them \(one per cell\)"):
        SamplingSettings.build(None, [4, 0], 2.0)
    with pytest.raises(InvalidArgumentError, match="guidance_scale"):
        SamplingSettings.build(None, 4, 0.0)


def test_a_single_count_without_a_model_applies_to_every_cell_of_the_plan():
    plan = SamplingSettings.build(None, 3, 2.0).plan(4)
    assert [c.num_steps for c in plan.cells] == [3, 3, 3, 3]
    with pytest.raises(InvalidArgumentError, match="give 2 step counts, but this model makes 4 cells"):
        SamplingSettings.build(None, [3, 2], 2.0).plan(4)


def test_settings_made_directly_are_checked_too():
    with pytest.raises(InvalidArgumentError, match="sampler must be one of"):
        SamplingSettings((4, 4, 4, 4), 2.0, "ddim")
    with pytest.raises(InvalidArgumentError, match="guidance_scale must be a finite number"):
        SamplingSettings((4,), float("nan"))
    with pytest.raises(InvalidArgumentError, match="use SamplingSettings.build"):
        SamplingSettings([4, 4, 4, 4], 2.0)  # a list: not hashable, not normalised
    assert SamplingSettings((4,), 2.0) == SamplingSettings.build(None, 4, 2.0)


def test_an_unknown_schedule_is_refused_where_scales_are_computed():
    with pytest.raises(InvalidArgumentError, match="guidance_schedule must be one of"):
        cell_guidance_scales(2.0, 4, "cosine")


def test_plan_gives_each_cell_its_steps_and_scale():
    plan = SamplingSettings.build(4, [4, 3, 2, 1], 2.5).plan(4)
    assert plan.cells == (CellPlan(4, 1.0), CellPlan(3, 1.5), CellPlan(2, 2.0), CellPlan(1, 2.5))
    assert plan.sampler == "sde" and plan.guidance_interval == (0.0, 1.0)
    constant = SamplingSettings.build(4, 2, 2.5, guidance_schedule="constant").plan(4)
    assert [c.scale for c in constant.cells] == [2.5] * 4
    with pytest.raises(InvalidArgumentError, match="these settings give 4 step counts, but this model makes 3 cells"):
        SamplingSettings.build(4, 2, 2.5).plan(3)


def test_guides_within_the_interval_where_the_scale_exceeds_one():
    plan = SamplingSettings.build(4, 5, 2.5, guidance_interval=(0.3, 0.7)).plan(4)
    assert not plan.guides(0, 0.5)  # the linear schedule's first cell has scale 1
    assert plan.guides(1, 0.3) and plan.guides(3, 0.7)  # the bounds are inside
    assert not plan.guides(3, 0.29) and not plan.guides(3, 0.71)
    assert plan.guided
    everywhere = SamplingSettings.build(4, 5, 2.5).plan(4)
    assert all(everywhere.guides(3, t) for t in (0.0, 0.04, 1.0))


def test_guided_is_whether_any_cell_guides():
    assert not SamplingSettings.build(4, 4, 1.0).plan(4).guided
    assert SamplingSettings.build(4, 4, 1.01).plan(4).guided
    assert SamplingSettings.build(1, 4, 2.0).plan(1).cells == (CellPlan(4, 2.0),)  # one cell takes the full scale


@pytest.mark.parametrize("sampler, steps, evaluations", [("sde", [4, 3, 2, 1], 10), ("euler", 3, 12), ("heun", 3, 20),
                                                         ("heun", [1, 2, 3, 4], 1 + 3 + 5 + 7)])
def test_num_evaluations(sampler, steps, evaluations):
    plan = SamplingSettings.build(4, steps, 2.0, sampler).plan(4)
    assert plan.num_evaluations == evaluations


def test_evaluation_times_per_sampler():
    assert evaluation_times("sde", 3) == pytest.approx([1.0, 0.52, 0.04])
    assert evaluation_times("sde", 1) == [1.0]
    assert evaluation_times("euler", 2) == [1.0, 0.5]
    assert evaluation_times("heun", 2) == [1.0, 0.5, 0.5]  # the corrector evaluates at the step's end
    for sampler in ("sde", "euler", "heun"):
        for n in (1, 2, 5):
            assert len(evaluation_times(sampler, n)) == evaluations_per_cell(sampler, n)


def test_modulation_times_are_every_time_evaluated_and_zero():
    plan = SamplingSettings.build(4, [2, 1, 2, 1], 2.0).plan(4)
    assert plan.modulation_times == pytest.approx([0.0, 0.04, 1.0])
    assert SamplingSettings.build(4, 2, 2.0, "heun").plan(4).modulation_times == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("sampler", ["sde", "euler", "heun"])
def test_the_sampler_evaluates_only_at_modulation_times(sampler):
    """The engine looks each evaluation's time up in a table keyed by ``modulation_times``: the sampler's
    times must be those floats exactly."""
    plan = SamplingSettings.build(4, [3, 5, 2, 1], 2.0, sampler).plan(4)
    noise = NoiseSource(torch.Generator().manual_seed(0), 1, torch.device("cpu"))
    sampler_run = sample_image(plan, noise, (4, 1), grid_size=4, cell_size=2)
    times, evaluation = [], next(sampler_run)
    try:
        while True:
            times.append(evaluation.t)
            velocity = torch.zeros(2 if evaluation.guide else 1, 4, 1, dtype=torch.float64)
            evaluation = sampler_run.send(apply_updates([evaluation.update], [velocity])[0])
    except StopIteration:
        pass
    assert len(times) == plan.num_evaluations
    assert set(times) <= set(plan.modulation_times) and 0.0 not in times
