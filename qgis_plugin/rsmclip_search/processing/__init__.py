"""The RS-M-CLIP Processing provider: indexing, text search, search by example, heatmaps and change as
Processing algorithms over the rsmclip_geo core's API."""
