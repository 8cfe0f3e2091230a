"""Producer side of ml-framework: submit jobs, follow them, read results."""

from producer.client import Client
from producer.job import Job
from producer.plan import JobOptions

__all__ = ["Client", "Job", "JobOptions"]
