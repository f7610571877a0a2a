"""Datasets: COCO instances reading and writing (`coco`), the synthetic demo domains (`synthetic`),
and the task prompts and their compositions (`tasks`).

May import talora.io only."""
