"""The Triton model repository: model configs generated through Triton's own protobuf schema
(:mod:`.model_config`), versioned writes and reading configs back (:mod:`.layout`), and
``s3://`` repositories (:mod:`.s3`)."""
