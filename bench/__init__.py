"""rtdmd benchmark harness: prompt suites -> images -> scores -> summaries -> leaderboards."""
