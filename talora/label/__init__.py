"""The labelling job (`job`): a prompt and a bucket of images in, committed COCO-format prediction
rows out; box prompts (`boxes`); and the exports of a run to detector formats (`export`).

May import talora.predict, model, batch, data, backbones, io and config."""
