import sys

if sys.argv[1:2] == ["datapath"]:  # python -m bench datapath: the data path in the namespace lab (root)
    from .datapath import main as datapath_main

    sys.exit(datapath_main(sys.argv[2:]))

if sys.argv[1:2] == ["chaos"]:  # python -m bench chaos: faults with traffic in the namespace lab (root)
    from .chaos import main as chaos_main

    sys.exit(chaos_main(sys.argv[2:]))

from .run import main

sys.exit(main())
