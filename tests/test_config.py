import pytest

from pgolf.config import PRESETS, ConfigError, Hyperparameters, parse_flags, resolve


def test_baseline_preset_is_the_challenge_baseline():
    cfg = resolve("baseline", env={})
    assert (cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_mult) == (9, 512, 8, 4, 2.0)
    assert (cfg.vocab_size, cfg.train_seq_len, cfg.train_batch_tokens) == (1024, 1024, 524_288)
    assert (cfg.matrix_lr, cfg.scalar_lr, cfg.tied_embed_lr, cfg.embed_lr, cfg.head_lr) == (0.04, 0.04, 0.05, 0.6, 0.008)
    assert (cfg.muon_momentum, cfg.muon_momentum_warmup_start, cfg.muon_momentum_warmup_steps) == (0.95, 0.85, 500)
    assert (cfg.warmdown_iters, cfg.logit_softcap, cfg.max_wallclock_seconds) == (1200, 30.0, 600.0)
    assert cfg.quant_format == "int8_zlib" and not cfg.qat and cfg.eval_stride == 0


def test_precedence_default_preset_env_flags():
    assert resolve("smoke", env={}).num_layers == 2  # preset beats default
    assert resolve("baseline", env={"NUM_LAYERS": "4"}).num_layers == 4  # env beats preset
    assert resolve("smoke", env={"NUM_LAYERS": "4"}).num_layers == 4
    assert resolve("smoke", env={"NUM_LAYERS": "4"}, flags={"num_layers": "3"}).num_layers == 3  # flags beat env
    assert resolve(None, env={"PGOLF_NUM_LAYERS": "5", "PRESET": "smoke"}).num_layers == 5


def test_env_values_are_coerced_by_type():
    cfg = resolve("baseline", env={"TIE_EMBEDDINGS": "0", "MATRIX_LR": "0.02", "ITERATIONS": "7", "RUN_ID": "x",
                                    "MLP_MULT": "3"})
    assert cfg.tie_embeddings is False and cfg.matrix_lr == 0.02 and cfg.iterations == 7 and cfg.run_id == "x"
    assert cfg.mlp_mult == 3.0 and isinstance(cfg.mlp_mult, float)
    with pytest.raises(ConfigError, match="ITERATIONS='seven' is not a valid int"):
        resolve("baseline", env={"ITERATIONS": "seven"})


def test_unknown_keys_are_errors_naming_the_key():
    with pytest.raises(ConfigError, match="PGOLF_NUM_LAYER"):
        resolve("baseline", env={"PGOLF_NUM_LAYER": "3"})
    with pytest.raises(ConfigError, match="--matrix_lrr"):
        resolve("baseline", env={}, flags={"matrix_lrr": "0.1"})
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve("nope", env={})
    # Unprefixed env vars that are not settings (PATH, HOME, ...) are the shell's business, not errors.
    assert resolve("baseline", env={"PATH": "/bin", "NUM_LAYER": "3"}).num_layers == 9


def test_parse_flags_forms():
    assert parse_flags(["--preset", "smoke", "--num_layers=3", "--matrix-lr", "0.1"]) == (
        "smoke", {"num_layers": "3", "matrix-lr": "0.1"})
    with pytest.raises(ConfigError, match="needs a value"):
        parse_flags(["--seed"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_flags(["seed=3"])


def test_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="MUON_VARIANT"):
        resolve("baseline", env={"MUON_VARIANT": "adam"})
    with pytest.raises(ConfigError, match="TRAIN_BATCH_TOKENS"):
        resolve("baseline", env={"TRAIN_BATCH_TOKENS": "1000"})
    with pytest.raises(ConfigError, match="QUANT_FORMAT=int6_zstd"):
        resolve("baseline", env={"QAT": "1"})


def test_every_preset_resolves_and_only_names_real_fields():
    names = set(Hyperparameters.__dataclass_fields__)
    for name, overrides in PRESETS.items():
        assert set(overrides) <= names, name
        resolve(name, env={})
