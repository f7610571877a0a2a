"""Labels out as a training dataset: a labelling run -> a detector's format, one writer per format.

    talora export --predictions OUT/<run_key> --format coco --out s3://b/labels/instances.json
    talora export --predictions OUT/<run_key> --format yolo --out s3://b/yolo/

`config` says what is asked for (`ExportConfig`); `run` reads the run one committed part at a time and hands every kept row to the format's
`Writer` (`writer`: the interface and what the writers share), chosen by name from `run.WRITERS`:
`coco` (an instances JSON) and `yolo` (YOLO-seg label files). Adding a format = one module with
its `Writer` and its entry in `WRITERS`.

May import talora.batch (rows) and talora.io.
"""
