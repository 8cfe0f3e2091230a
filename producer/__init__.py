"""Producer side of ml-framework: submit jobs, follow them, read results."""

from producer.client import Client, Job

__all__ = ["Client", "Job"]
