"""kohya's formats: the training config as a graph, ss_* metadata and modelspec, sample prompts."""
