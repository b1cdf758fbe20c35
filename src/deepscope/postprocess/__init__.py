"""From network outputs to instances: seeded watershed, star-convex polygons, flow following, tiled merging."""
