"""The pipeline's stages 1-5: teacher → targets → experts → init → distill, each writing one
artifact into the run directory (:class:`~distilled_ssl.stages.context.RunContext`)."""
