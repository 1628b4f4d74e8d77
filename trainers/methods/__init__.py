"""One file per adapter method: a config dataclass with the paper's defaults, the method class, its private math."""
