"""Response caches: the exact cache (same request, same answer) and the semantic cache (a paraphrase of a
cached question gets the cached answer). See docs/caching.md."""
