"""Reading labelled data and images: layouts, decoding, crop, transforms, loading, cache,
synthetic phantoms and checks."""
