"""Training: the loop (`trainer`) and its parts: model and data construction (`build`), the
DeepSpeed engine (`engine`), checkpoints (`checkpoint`: the format; `checkpointer`: saving
and loading through the engine), periodic validation (`validation`), the bad-step policy
(`guard`) and stopping (`stop`)."""
