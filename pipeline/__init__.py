"""Teacher-guided video action recognition: a staged data-and-training DAG."""
