"""Apply: the quantized backbone and adapter writers (`writer`), QuantLinear and
`load_quantized` (`nn`). Importing it loads neither pandas nor PuLP."""
