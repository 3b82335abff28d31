from peakllm.cli import main

raise SystemExit(main())
