"""Where records come from: folders, manifests, transcripts and http(s) URLs (``sources.http``,
imported only where a URL is fetched: it brings httpx)."""


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))
