"""Datasets: registry, loaders, downloader, the leave-last-out split and user text."""
