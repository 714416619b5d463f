bits 16
org 0x7c00
start:
    cli
    in   al, 0x92          ; fast A20 gate on
    or   al, 2
    out  0x92, al
    lgdt [gdtdesc]
    mov  eax, cr0
    or   al, 1
    mov  cr0, eax
    jmp  dword 0x08:pm
bits 32
pm:
    mov  ax, 0x10
    mov  ds, ax
    mov  es, ax
    mov  ss, ax
    mov  dx, 0x3f8
outer:
    mov  eax, 0x00100000
inner:
    inc  byte [eax]
    add  eax, 4096
    cmp  eax, 0x06400000
    jb   inner
    mov  al, 'B'
    out  dx, al
    jmp  outer
align 8
gdt:
    dq 0
    dq 0x00cf9a000000ffff
    dq 0x00cf92000000ffff
gdtdesc:
    dw gdtdesc - gdt - 1
    dd gdt
    times 510-($-$$) db 0
    dw 0xaa55
