"""orjson as Faust's codec, so tables and topics speak plain JSON.

Registered under the name ``"orjson"``; :mod:`streams.app` uses it for table
values and for the records agents send.

>>> OrjsonCodec().loads(OrjsonCodec().dumps({"a": [1, 2]}))
{'a': [1, 2]}
"""
from __future__ import annotations

from typing import Any

import orjson
from faust.serializers import codecs


class OrjsonCodec(codecs.Codec):
    def _dumps(self, obj: Any) -> bytes:
        return orjson.dumps(obj)

    def _loads(self, s: bytes) -> Any:
        return orjson.loads(s)


def register() -> None:
    codecs.register("orjson", OrjsonCodec())
