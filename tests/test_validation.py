"""Every numeric hyper-parameter of the built-in estimators and quantizers is validated in
``__init__`` (finite, in range; flags are bools) and the error names the argument."""

import numpy as np
import pytest

from kquant.estimators.ede import EDE
from kquant.estimators.htge import DSQ, HTGE
from kquant.estimators.sign_surrogates import SwishSign
from kquant.estimators.ste import ClippedSTE
from kquant.quantizers import BWN, PACT, TWN, BitNet, DoReFa, StochasticSign, Uniform
from kquant.validation import check_bool, check_choice, check_jit_compile, check_number

pytestmark = pytest.mark.core

INF, NAN = float("inf"), float("nan")

BAD = [
    (ClippedSTE, {"clip": INF}, "clip"), (ClippedSTE, {"clip": NAN}, "clip"),
    (ClippedSTE, {"clip": 0.0}, "clip"), (ClippedSTE, {"clip": "1"}, "clip"),
    (ClippedSTE, {"clip": True}, "clip"),
    (HTGE, {"t": INF}, "t"), (HTGE, {"t": -1.0}, "t"), (HTGE, {"t": NAN}, "t"),
    (DSQ, {"alpha": NAN}, "alpha"), (DSQ, {"alpha": 1.0}, "alpha"), (DSQ, {"alpha": 0.0}, "alpha"),
    (DSQ, {"learn_alpha": "no"}, "learn_alpha"), (DSQ, {"soft_forward": 1}, "soft_forward"),
    (EDE, {"t_min": INF}, "t_min"), (EDE, {"t_max": NAN}, "t_max"), (EDE, {"t_min": 0.0}, "t_min"),
    (EDE, {"t_min": 5.0, "t_max": 1.0}, "t_min"),
    (SwishSign, {"beta": INF}, "beta"), (SwishSign, {"beta": 0.0}, "beta"),
    (DoReFa, {"bits": INF}, "bits"), (DoReFa, {"bits": True}, "bits"),
    (Uniform, {"step": INF}, "step"), (Uniform, {"step": NAN}, "step"),
    (Uniform, {"symmetric": False, "offset": NAN}, "offset"),
    (Uniform, {"symmetric": False, "offset": INF}, "offset"),
    (Uniform, {"symmetric": "no"}, "symmetric"),
    (Uniform, {"per_channel": "no"}, "per_channel"), (BWN, {"per_channel": "no"}, "per_channel"),
    (TWN, {"threshold_factor": INF}, "threshold_factor"),
    (TWN, {"threshold_factor": -0.7}, "threshold_factor"),
    (TWN, {"per_channel": "no"}, "per_channel"),
    (BitNet, {"epsilon": NAN}, "epsilon"), (BitNet, {"epsilon": 0.0}, "epsilon"),
    (BitNet, {"per_channel": "no"}, "per_channel"),
    (StochasticSign, {"seed": 1.5}, "seed"), (StochasticSign, {"seed": "1"}, "seed"),
    (PACT, {"alpha": INF}, "alpha"), (PACT, {"alpha": 0.0}, "alpha"),
    (PACT, {"alpha_l2": -1.0}, "alpha_l2"), (PACT, {"alpha_l2": NAN}, "alpha_l2"),
    (PACT, {"bits": 0}, "bits"),
]


@pytest.mark.parametrize("cls, kwargs, argument", BAD,
                         ids=[f"{c.__name__}-{'-'.join(map(str, k.items()))}" for c, k, _ in BAD])
def test_bad_hyper_parameter_raises_naming_it(cls, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        cls(**kwargs)


def test_validators_accept_good_values_and_word_their_errors():
    assert check_number(np.float32(2.5), "t", gt=0) == 2.5 and check_number(3, "t") == 3.0
    assert check_bool(np.bool_(True), "flag") is True
    assert check_choice("a", "mode", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"^`t` must be a finite number > 0, got inf\.$"):
        check_number(INF, "t", gt=0)
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number in \(0, 1\), got 1"):
        check_number(1, "alpha", gt=0, lt=1)
    with pytest.raises(ValueError, match=r"`mode` must be one of 'a', 'b', got 'c'"):
        check_choice("c", "mode", ("a", "b"))


def test_jit_compile_takes_exactly_what_keras_compile_takes():
    assert check_jit_compile("auto") == "auto" and check_jit_compile(np.bool_(False)) is False
    assert check_jit_compile(True) is True
    for bad in (1, 0, "on", "true", None):
        with pytest.raises(ValueError, match=r"^`jit_compile` must be 'auto', True or False"):
            check_jit_compile(bad)
