"""What scores items: retrieval sources, the serving funnel, and (later) learned models."""
