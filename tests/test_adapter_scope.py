"""`load_adapter`'s switch-off of PEFT's MoE conversions acts for the loading thread only."""

import threading

import pytest
from peft.utils import transformers_weight_conversion as conversion

from bitalloc.artifacts.adapter import _keep_per_expert_targets

NAMES = ("convert_peft_config_for_transformers", "convert_peft_adapter_state_dict_for_transformers")


@pytest.fixture
def peft_functions(monkeypatch):
    """PEFT's two conversion functions replaced by ones that say they ran."""
    for name in NAMES:
        monkeypatch.setattr(conversion, name, lambda *args, _name=name, **kwargs: f"peft {_name}")
    return {name: getattr(conversion, name) for name in NAMES}


def test_inside_the_block_this_thread_skips_the_conversions(peft_functions):
    with _keep_per_expert_targets():
        assert conversion.convert_peft_config_for_transformers("config") is None
        state = {"a.lora_A.weight": 1}
        assert conversion.convert_peft_adapter_state_dict_for_transformers(adapter_state_dict=state) is state
        with _keep_per_expert_targets():  # nested: still skipped, and skipped after the inner exit
            pass
        assert conversion.convert_peft_config_for_transformers("config") is None
    assert {name: getattr(conversion, name) for name in NAMES} == peft_functions


def test_another_thread_converts_as_usual_meanwhile(peft_functions):
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def other():
        inside.wait(timeout=30)
        seen["config"] = conversion.convert_peft_config_for_transformers("config")
        seen["state"] = conversion.convert_peft_adapter_state_dict_for_transformers(adapter_state_dict={})
        done.set()

    worker = threading.Thread(target=other)
    worker.start()
    with _keep_per_expert_targets():
        inside.set()
        assert done.wait(timeout=30)
        mine = conversion.convert_peft_config_for_transformers("config")
    worker.join(timeout=30)
    assert mine is None
    assert seen == {"config": f"peft {NAMES[0]}", "state": f"peft {NAMES[1]}"}


def test_overlapping_blocks_in_two_threads_restore_peft_once_both_leave(peft_functions):
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def second():
        a_in.wait(timeout=30)
        with _keep_per_expert_targets():
            b_in.set()
            a_out.wait(timeout=30)  # the first thread has left: this one still skips
            seen["b"] = conversion.convert_peft_config_for_transformers("config")

    worker = threading.Thread(target=second)
    worker.start()
    with _keep_per_expert_targets():
        a_in.set()
        assert b_in.wait(timeout=30)
    seen["a after"] = conversion.convert_peft_config_for_transformers("config")
    a_out.set()
    worker.join(timeout=30)
    assert seen == {"b": None, "a after": f"peft {NAMES[0]}"}
    assert {name: getattr(conversion, name) for name in NAMES} == peft_functions
