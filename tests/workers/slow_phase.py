"""``train_comat.py`` with one phase that hangs, for the preemption tests (same flags as the script).

``SLOW_PHASE=step``: every micro-step after the first sleeps for ten minutes — a step longer than any launcher's
shutdown timeout. ``SLOW_PHASE=validation``: the validation does. The hang prints ``slow phase started`` first."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import train_comat  # noqa: E402
from utils import training_loop  # noqa: E402


def hang(*args, **kwargs):
    print("slow phase started", flush=True)
    time.sleep(600)


def slow_after_the_first(micro_step_method):
    def micro_step(self, batch_prompts, micro_step):
        if micro_step >= 1:
            hang()
        return micro_step_method(self, batch_prompts, micro_step)

    return micro_step


if os.environ["SLOW_PHASE"] == "step":
    training_loop.CoMatIteration.micro_step = slow_after_the_first(training_loop.CoMatIteration.micro_step)
elif os.environ["SLOW_PHASE"] == "validation":
    training_loop.log_validation = hang

if __name__ == "__main__":
    train_comat.main()
