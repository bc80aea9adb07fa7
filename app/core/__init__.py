"""What every layer shares: the error types clients see and the task store. Engine and jobs are peers on top."""
