"""Serve a TRL-style reward function to grpo as an external command reward.

    reward_funcs = ["correctness", "cmd:python3 -m grpo_reward my_rewards:my_func"]

runs `my_func(prompts, completions, completion_ids, **columns)` from `my_rewards.py` unchanged
(an `async def` one too), once per batch, as TRL's GRPOTrainer calls it. `python3 -m grpo_reward` needs this file on the
Python path (`PYTHONPATH=/path/to/grpo/python`, or a copy beside your code); running the file
itself works too: `cmd:python3 /path/to/grpo/python/grpo_reward.py my_rewards:my_func`.
MODULE:FUNCTION names a module importable from the current folder (or PYTHONPATH) or a `.py`
file: `rewards/mine.py:my_func`. Standard library only.

Protocol (docs/REWARDS.md): grpo writes one JSON object per line on standard input, with
`prompts`, `completions`, `completion_ids`, every dataset column, and `trainer_state` when
training; this adapter answers one line `{"rewards": [...]}` per request on standard output
(None becomes null: no reward), or `{"error": "..."}` when the function raises (the traceback
goes to standard error). Anything the function prints goes to standard error, so it cannot
corrupt the replies. The adapter exits when its standard input ends.

`trainer_state` reaches the function as an object with `global_step`, `max_steps` and `epoch`
(None outside training, in `grpo score`); `log_extra` and `log_metric` are accepted and
ignored (grpo does not log what they are given).
"""

import asyncio
import importlib
import importlib.util
import inspect
import json
import os
import sys
import traceback
import types

# Fields of a request that are not dataset columns.
REQUEST_FIELDS = ("prompts", "completions", "completion_ids", "trainer_state")


def load_function(spec):
    """The function named by `MODULE:FUNCTION`, MODULE a module name or a path to a .py file."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise SystemExit(
            f"grpo_reward: expected MODULE:FUNCTION (e.g. my_rewards:accuracy), got {spec!r}"
        )
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        loader_spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(path))[0], path
        )
        if loader_spec is None or not os.path.isfile(path):
            raise SystemExit(f"grpo_reward: no Python file {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, os.path.dirname(path))
        loader_spec.loader.exec_module(module)
    else:
        # As `python -m` does: modules in the current folder are importable.
        sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SystemExit(f"grpo_reward: {module_name} has no function {function_name!r}")
    return function


def ignore(*args, **kwargs):
    """`log_extra` / `log_metric`: accepted, not logged."""


def as_reply_value(value):
    """A returned reward as JSON: None stays null, numbers (bool, numpy and torch scalars
    included) become floats; anything else is passed on for grpo to refuse by name."""
    if value is None or isinstance(value, str):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return repr(value)


def score(function, request):
    """The function's rewards for one request, as TRL's GRPOTrainer calls it."""
    columns = {key: value for key, value in request.items() if key not in REQUEST_FIELDS}
    state = request.get("trainer_state")
    rewards = function(
        prompts=request["prompts"],
        completions=request["completions"],
        completion_ids=request["completion_ids"],
        trainer_state=None if state is None else types.SimpleNamespace(**state),
        log_extra=ignore,
        log_metric=ignore,
        **columns,
    )
    if inspect.isawaitable(rewards):  # an `async def` reward function, as TRL allows
        rewards = asyncio.run(rewards)
    return [as_reply_value(value) for value in rewards]


def serve(function, requests, replies):
    """Answers each request line of `requests` with one line on `replies` until it ends."""
    for line in requests:
        if not line.strip():
            continue
        try:
            reply = {"rewards": score(function, json.loads(line))}
        except Exception as error:  # the function's own errors go back to grpo, named
            traceback.print_exc()
            reply = {"error": f"{type(error).__name__}: {error}"}
        # NaN and Infinity are written as such (not JSON): grpo names them as non-finite.
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        raise SystemExit("usage: python3 -m grpo_reward MODULE:FUNCTION\n\n" + __doc__)
    # Replies go to the real standard output; everything else written there (print() in the
    # reward function, C extensions) goes to standard error.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    function = load_function(argv[1])
    requests = open(sys.stdin.fileno(), encoding="utf-8", closefd=False)
    serve(function, requests, replies)


if __name__ == "__main__":
    main(sys.argv)
