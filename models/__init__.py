"""What scores items: retrieval sources, the serving funnel, the learned models
(two towers, the multi-task ranker) and their training, gating and calibration;
also the simulator's world and policies."""
