"""Rule, in Python: the same lookup as plugins/rule (Rust), built with componentize-py.

Look the vision stage's category up in the `disposal_rules` kv namespace; an unknown category
fails the item (fatal), like the Rust stage.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import kv, log
# `types` of stagehand:pipeline; wasi:http has a `types` too, so the bindings name both in full.
from wit_world.imports import stagehand_pipeline_types as types


def fatal(message: str) -> Err:
    return Err(types.StageError_Fatal(message))


class WitWorld(wit_world.WitWorld):
    def run(self, ctx: types.Context, input: str) -> str:
        try:
            category = json.loads(input)["stages"]["vision"]["category"]
            key = "{}/{}/{}".format(category["major"], category["middle"], category["minor"])
        except (ValueError, KeyError, TypeError) as error:
            raise fatal(f"no vision category in the input: {error!r}")
        try:
            rule = kv.get("disposal_rules", key)
        except Err as error:
            raise fatal(f"no kv namespace `{error.value.value}` in the pipeline")
        if rule is None:
            raise fatal(f"unknown category `{key}`: no disposal rule for it")
        log.write(log.Level.DEBUG, f"rule for {key} (python)")
        return json.dumps({"rule_key": key, "rule": json.loads(rule)}, separators=(",", ":"))
