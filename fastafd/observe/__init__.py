"""Observability: what a run shows while it trains, and nothing that reads a device value.

The trainer hands over the host values it already read at its log interval (``RunningMeans.means()``,
the loop's only device-to-host sync, every ``loop.log_interval`` steps), so TensorBoard logging, the
progress bar and the data-wait clock add no synchronisation to the training loop.

| module | job |
| --- | --- |
| ``console`` | the training progress (tqdm bar or lines), epoch summaries, ``write``/``warn`` |
| ``progress`` | the data commands' progress (demo generation, ``data verify``, ``data pack``) |
| ``tensorboard`` | the run's scalars to TensorBoard and the trackers, their tags |
| ``trackers`` | W&B and MLflow |
| ``profile`` | ``torch.profiler`` traces and the trace/NVTX ranges |
| ``clock`` | the data-wait clock and interval means |
"""
