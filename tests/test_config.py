"""The run configuration: YAML + overrides round trip, and errors that name the field and value."""

from pathlib import Path

import jax.numpy as jnp
import pytest

from sfpo_jax.optim import calls_per_batch
from sfpo_jax.optim import sfpo as sfpo_transform
from sfpo_jax.train.config import Config, ConfigError, load_config, save_config


def test_defaults_are_the_paper_settings():
    cfg = Config()
    assert (cfg.sfpo.num_fast_steps, cfg.sfpo.alpha) == (3, 0.8)
    assert (cfg.sfpo.entropy_window, cfg.sfpo.entropy_threshold) == (30, 1.0)
    assert (cfg.optim.learning_rate, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (1e-6, 0.01, 1.0)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.num_minibatches) == (256, 8, 4)
    assert (cfg.loss.clip_low, cfg.loss.agg, cfg.loss.entropy_coef, cfg.loss.kl_coef) == (0.2, "token-mean", 1e-3, 0)


def test_grpo_is_sfpo_with_no_fast_steps_and_ignores_the_sfpo_section():
    params = {"w": jnp.zeros(3)}
    M = ["rollout.prompts_per_step=8", "rollout.num_minibatches=2"]
    grpo = load_config(None, ["algo=grpo", "sfpo.num_fast_steps=5", "sfpo.slow_correction=false", *M])
    assert calls_per_batch(grpo.optimizer().init(params)) == 2
    sfpo = load_config(None, ["algo=sfpo", "sfpo.num_fast_steps=5", *M])
    assert calls_per_batch(sfpo.optimizer().init(params)) == (5 + 1) * 2


def test_sections_take_their_defaults_from_the_objects_they_configure():
    import inspect

    from sfpo_jax.sampling import SamplingConfig
    from sfpo_jax.train.config import RolloutConfig, SFPOConfig

    for name, param in inspect.signature(sfpo_transform).parameters.items():
        if name != "num_minibatches":
            assert getattr(SFPOConfig(), name) == param.default, name
    for name in ("temperature", "top_p", "top_k"):
        assert getattr(RolloutConfig(), name) == getattr(SamplingConfig(max_new_tokens=1), name)


def test_yaml_and_overrides_round_trip(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("algo: grpo\nsfpo: {alpha: 0.5}\nrollout: {prompts_per_step: 8, num_minibatches: 2}\n")
    cfg = load_config(path, ["sfpo.entropy_window=null", "optim.learning_rate=3e-5", "task.kwargs={digits: 2}"])
    assert cfg.algo == "grpo" and cfg.sfpo.alpha == 0.5 and cfg.sfpo.entropy_window is None
    assert cfg.optim.learning_rate == 3e-5 and cfg.task.kwargs == {"digits": 2}
    assert isinstance(cfg.sfpo.alpha, float)
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sfpo.alpha=1.5", "sfpo.alpha must be in [0, 1], got alpha=1.5"),
        ("sfpo.num_fast_steps=-1", "sfpo.num_fast_steps must be an integer >= 0, got num_fast_steps=-1"),
        ("sfpo.entropy_window=1", "sfpo.entropy_window must be None or an integer >= 2"),
        ("sfpo.entropy_threshold=.inf", "sfpo.entropy_threshold must be a finite number"),
        ("rollout.group_size=1", "rollout.group_size=1 must be >= 2"),
        ("rollout.top_p=1.5", "rollout.top_p=1.5 must be in (0, 1]"),
        ("eval.top_p=0", "eval.top_p=0.0 must be in (0, 1]"),
        ("loss.clip_low=1.5", "loss.clip_low must be < 1.0, got 1.5"),
        ("optim.learning_rate=0", "optim.learning_rate must be a finite number > 0, got 0.0"),
        ("optim.learning_rate=.inf", "optim.learning_rate must be a finite number > 0, got inf"),
        ("optim.weight_decay=.nan", "optim.weight_decay must be a finite number >= 0, got nan"),
        ("optim.b1=-1", "optim.b1 must be a finite number in [0, 1), got -1.0"),
        ("optim.b2=1.5", "optim.b2 must be a finite number in [0, 1), got 1.5"),
        ("optim.max_grad_norm=.inf", "optim.max_grad_norm must be a finite number > 0, got inf"),
        ("run.seed=-5", "run.seed=-5 must be in [0, 2**63)"),
        ("rollout.group_sise=4", "rollout.group_sise: did you mean rollout.group_size?"),
        ("rolout.group_size=4", "rolout: did you mean rollout?"),
        ("rollout=8", "rollout must be a mapping (a section), got 8"),
        ("sfpo.alpah=0.5", "unknown field(s) ['alpah'] in section 'sfpo'"),
        ("rollout.group_size=eight", "rollout.group_size: 'eight' (expected an integer)"),
        ("rollout.group_size=true", "rollout.group_size: True (expected an integer)"),
        ("rollout.num_minibatches=3", "rollout.num_minibatches=3 must divide prompts_per_step=256"),
        ("loss.agg=sum", "loss.agg: 'sum' (expected one of"),
        ("algo=ppo", "algo: 'ppo'"),
        ("model.attention=cudnn", "model.attention='cudnn' needs compute_dtype 'bfloat16'"),
        ("model.attention=flash", "model.attention: 'flash' (expected one of"),
        ("nosuchsection.x=1", "unknown field(s) ['nosuchsection']"),
        ("sfpo", "not of the form section.field=value"),
    ],
)
def test_errors_name_field_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_duplicate_yaml_keys_are_refused_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("rollout:\n  group_size: 4\noptim: {learning_rate: 1.0e-3}\nrollout:\n  prompts_per_step: 8\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'rollout' on lines 1 and 4"):
        load_config(path)
    path.write_text("rollout: {group_size: 4, group_size: 8}\n")  # nested, on one line
    with pytest.raises(ConfigError, match="duplicate key 'group_size' on lines 1 and 1"):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------------------------
# The shipped configs in experiments/configs/.

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
