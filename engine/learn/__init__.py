"""DivMerge: learn merge coefficients by streaming a merged model block by block. protocol: what a merged
model that can be streamed provides; learner: the one learner (batches, teacher cache, Adam, result, the
`divmerge` flow); settings: the pydantic settings / YAML and prompts; full: full task vectors; model,
teacher, losses: the streamed decoder, the teacher pass, the objectives; cli: `blockmerge divmerge`."""
