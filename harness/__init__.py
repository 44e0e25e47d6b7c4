"""The safety harness: everything about running the article's code safely and conveniently,
kept out of the files that teach it. See harness/README.md for what it guarantees."""
