"""`peakllm plan`: what each way of compressing and running a model costs on this machine, before any work."""
