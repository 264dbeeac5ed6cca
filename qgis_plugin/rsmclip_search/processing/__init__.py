"""The RS-M-CLIP Processing provider: indexing, text search, search by example and heatmaps as
Processing algorithms over the rsmclip_geo core's API."""
