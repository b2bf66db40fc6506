"""DivMerge: learn merge coefficients by streaming a merged model block by block (the streamed model,
the teacher pass, the divergence objectives, the learner)."""
