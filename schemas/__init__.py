"""Records, the topic catalogue and codecs: the one place that defines what is on the wire."""
from schemas.events import (EVENT_TYPES, NEGATIVE_TYPES, POSITIVE_TYPES, SCHEMA_VERSION,
                            EngagementEvent, SchemaError, parse_event, parse_events)
from schemas.requests import (RankedItem, RecommendationReply, RecommendationRequest,
                              decode_reply, decode_request, parse_request)
from schemas.topics import TopicSpec, catalogue

__all__ = [
    "EVENT_TYPES", "NEGATIVE_TYPES", "POSITIVE_TYPES", "SCHEMA_VERSION", "EngagementEvent",
    "SchemaError", "parse_event", "parse_events", "RankedItem", "RecommendationReply",
    "RecommendationRequest", "decode_reply", "decode_request", "parse_request", "TopicSpec",
    "catalogue",
]
