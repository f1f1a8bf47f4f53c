"""fastgen behind other libraries' own extension points (DESIGN rule 10). Each submodule imports its
library, so import only the one you use: ``import fastgen.integrations.transformers``."""
