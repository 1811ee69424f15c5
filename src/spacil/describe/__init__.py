"""Class descriptions: the images an LLM is shown (`sampling`), the LLM client (`client`), description files
and the public formats they are imported from (`descriptions`)."""
