"""Training CLIP on curated data: the data pipeline, online balancing, the loop and its eval."""
