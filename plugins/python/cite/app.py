"""Cite, in Python: the fact-check example's second stage (examples/fact-check/polyglot.toml).

For the facts the `lookup` stage found, fetch where each comes from in the facts service's
`/sources` (outbound HTTP to a host the pipeline file grants), and return them as citations.
Where to look is the stage's setting `sources_url`.
"""

import json
from urllib.parse import quote

import wit_world
from stagehand_sdk import HttpError, fatal, request, setting
from wit_world.imports import log
from wit_world.imports import stagehand_pipeline_types as types


class WitWorld(wit_world.WitWorld):
    def run(self, ctx: types.Context, input: str) -> str:
        try:
            lookup = json.loads(input)["stages"]["lookup"]
            topics = [fact["topic"] for fact in lookup["facts"]]
        except (ValueError, KeyError, TypeError) as error:
            raise fatal(f"no `lookup` facts in the input: {error!r}")
        if not topics:
            return json.dumps({"citations": []})
        url = setting("sources_url") + "?topics=" + quote(",".join(topics))
        try:
            reply = request("GET", url)
        except HttpError as error:
            raise error.stage_error()
        if reply.status != 200:
            raise fatal(f"the sources service answered {reply.status}: {reply.text()}")
        citations = reply.json()["sources"]
        log.write(log.Level.DEBUG, f"{len(citations)} citations (python)")
        return json.dumps({"citations": citations}, separators=(",", ":"))
