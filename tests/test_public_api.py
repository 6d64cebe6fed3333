"""The package's public names: one import, loaded lazily; old module names still work
for one release, with a warning."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import posttrain

PUBLIC = ["SFTConfig", "train_sft", "generate", "evaluate_answers", "get_reward_fn"]
# Importable exactly where they always were.
STABLE = {
    "posttrain": ["get_response_log_probs", "tokenize_prompt_and_output", "compute_entropy"],
    "posttrain.rl": ["compute_group_normalized_rewards", "grpo_microbatch_train_step"],
    "posttrain.rewards": ["get_reward_fn", "r1_zero_reward"],
    "posttrain.generation": ["generate", "Sample"],
}


def test_import_posttrain_loads_no_torch() -> None:
    code = (
        "import sys, posttrain; assert 'torch' not in sys.modules, 'torch'; "
        f"names = {PUBLIC!r}; assert set(names) <= set(dir(posttrain)); "
        "assert 'torch' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_public_names_resolve_to_the_library_entry_points() -> None:
    from posttrain.config import SFTConfig
    from posttrain.evaluation.answers import evaluate_answers
    from posttrain.generation.decode import generate
    from posttrain.rewards import get_reward_fn
    from posttrain.sft.train import train

    assert posttrain.SFTConfig is SFTConfig and posttrain.train_sft is train
    assert posttrain.generate is generate and posttrain.evaluate_answers is evaluate_answers
    assert posttrain.get_reward_fn is get_reward_fn
    assert set(PUBLIC) <= set(posttrain.__all__)


@pytest.mark.parametrize(("module", "names"), STABLE.items())
def test_stable_import_paths(module: str, names: list[str]) -> None:
    imported = __import__(module, fromlist=names)
    for name in names:
        assert callable(getattr(imported, name)) or isinstance(getattr(imported, name), type)


def test_moved_modules_import_with_a_deprecation_warning() -> None:
    from posttrain._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = __import__(old, fromlist=["_"])
        assert any(issubclass(w.category, DeprecationWarning) for w in caught), old
        target = __import__(new, fromlist=["_"])
        public = [n for n in vars(target) if not n.startswith("_")]
        assert public and all(getattr(module, n) is getattr(target, n) for n in public), old
    from posttrain.training import train  # the old path of `posttrain sft`'s function

    assert train is posttrain.train_sft
