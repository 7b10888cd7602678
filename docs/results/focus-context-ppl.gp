set terminal pngcairo size 1100,700 font ',10' noenhanced
set output 'focus-context-ppl.png'
set title 'Context compression: perplexity rise against KV bytes'
set logscale x 2
set xrange [2000:30000]
set yrange [-2:30]
set xlabel 'KV bytes per token (log scale; f16 full cache = 23040)'
set ylabel 'perplexity rise vs the full cache (%)'
set grid
set key outside right top
plot 'focus-context-ppl.dat' index 0 using 1:2 with lp dt 1 pt 7 ps 1.1 lw 2 lc rgb '#1f77b4' title 'f16 + StreamingLLM', \
     'focus-context-ppl.dat' index 1 using 1:2 with lp dt 1 pt 7 ps 1.1 lw 2 lc rgb '#d62728' title 'f16 + H2O', \
     'focus-context-ppl.dat' index 2 using 1:2 with lp dt 1 pt 7 ps 1.1 lw 2 lc rgb '#2ca02c' title 'f16 + L2-norm', \
     'focus-context-ppl.dat' index 3 using 1:2 with lp dt 1 pt 7 ps 1.1 lw 2 lc rgb '#7f7f7f' title 'f16 + random', \
     'focus-context-ppl.dat' index 4 using 1:2 with lp dt 1 pt 7 ps 1.1 lw 2 lc rgb '#ff7f0e' title 'f16 + LSH-E (16 bits, sum)', \
     'focus-context-ppl.dat' index 5 using 1:2 with lp dt 1 pt 7 ps 1.1 lw 2 lc rgb '#9467bd' title 'f16 + LSH-E (16 bits, current)', \
     'focus-context-ppl.dat' index 6 using 1:2 with lp dt 1 pt 7 ps 1.1 lw 2 lc rgb '#000000' title 'KIVI int8 / int4 / int4 g64', \
     'focus-context-ppl.dat' index 7 using 1:2 with lp dt 1 pt 7 ps 1.1 lw 2 lc rgb '#17becf' title 'int4 g64 + H2O / LSH-E 75%', \
     'focus-context-ppl.dat' index 8 using 1:2 with lp dt 1 pt 7 ps 1.1 lw 2 lc rgb '#8c564b' title 'codec ae32/ae16 int8 (+ int4 values)', \
     'focus-context-ppl.dat' index 9 using 1:2 with lp dt 2 pt 6 ps 1.1 lw 2 lc rgb '#1f77b4' title 'kvpress-streaming', \
     'focus-context-ppl.dat' index 10 using 1:2 with lp dt 2 pt 6 ps 1.1 lw 2 lc rgb '#d62728' title 'kvpress-snapkv', \
     'focus-context-ppl.dat' index 11 using 1:2 with lp dt 2 pt 6 ps 1.1 lw 2 lc rgb '#2ca02c' title 'kvpress-observed', \
     'focus-context-ppl.dat' index 12 using 1:2 with lp dt 2 pt 6 ps 1.1 lw 2 lc rgb '#ff7f0e' title 'kvpress-knorm', \
     'focus-context-ppl.dat' index 13 using 1:2 with lp dt 2 pt 6 ps 1.1 lw 2 lc rgb '#9467bd' title 'kvpress-tova', \
     'focus-context-ppl.dat' index 14 using 1:2 with lp dt 2 pt 6 ps 1.1 lw 2 lc rgb '#8c564b' title 'kvpress-expected', \
     'focus-context-ppl.dat' index 15 using 1:2 with lp dt 2 pt 6 ps 1.1 lw 2 lc rgb '#e377c2' title 'llama.cpp-f16', \
     'focus-context-ppl.dat' index 16 using 1:2 with lp dt 2 pt 6 ps 1.1 lw 2 lc rgb '#bcbd22' title 'llama.cpp-q8_0', \
     'focus-context-ppl.dat' index 17 using 1:2 with lp dt 2 pt 6 ps 1.1 lw 2 lc rgb '#17becf' title 'llama.cpp-q4_0'
